"""The runtime: sequences, page manager, scheduler, model runner, sampler, LLMEngine and LLM."""
