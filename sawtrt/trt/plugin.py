"""SawAttention: SAW-INT4 paged attention as a Python TensorRT IPluginV3, and its creator.

Name "SawAttention", namespace "sawtrt", version "1". The class is a thin shell: fields and
their validation live in `params.py`, shape checks / format negotiation / workspace sizing /
the enqueue itself in `core.py` (plain functions, testable without TensorRT). trt_plugin/README.md
documents inputs, outputs, formats, fields and how to register the creator.

Importing this module needs a TensorRT Python API (`tensorrt`, or the TensorRT-RTX bindings for
the class logic; see compat.py); it raises compat.TensorRTUnavailable otherwise.
"""
from __future__ import annotations

import numpy as np

from . import compat, core
from .params import (FIELDS, NUM_INPUTS, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION,
                     AttentionParams, PluginParamError)

trt = compat.load()

_FIELD_TYPES = {"int32": trt.PluginFieldType.INT32, "float32": trt.PluginFieldType.FLOAT32,
                "char": trt.PluginFieldType.CHAR}
_dims_exprs = trt.DimsExprs      # indirection: tests without a TensorRT builder replace it


class _Fields(trt.PluginFieldCollection):
    """A PluginFieldCollection that keeps its PluginField objects and their arrays alive: the
    binding's collection holds raw C++ copies that point into them."""

    def __init__(self, fields):
        super().__init__(fields)
        self._keep = fields


def plugin_fields(params: AttentionParams) -> "trt.PluginFieldCollection":
    """Every field of `params` as a PluginFieldCollection (what the engine serializes)."""
    return _Fields([trt.PluginField(name, data, _FIELD_TYPES[kind])
                    for name, data, kind in params.to_fields()])


def params_from_fields(fc) -> AttentionParams:
    """AttentionParams from a PluginFieldCollection (or any iterable of PluginField)."""
    return AttentionParams.from_fields((f.name, f.data) for f in fc)


class SawAttention(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                   trt.IPluginV3OneRuntime):
    """One attention layer over the SAW-INT4 paged cache, for a mixed prefill/decode batch."""

    def __init__(self, params: AttentionParams, phase=None):
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        if not isinstance(params, AttentionParams):
            raise PluginParamError(f"SawAttention needs AttentionParams, got {type(params)}")
        self.plugin_name = PLUGIN_NAME
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        self.num_outputs = 1
        # Layers differ only in layer_index: let TensorRT time one of them.
        self.timing_cache_id = params.replace(layer_index=0).summary()
        self.params = params          # frozen dataclass: clone() can share it safely
        self.phase = phase
        self._signs = core.SignsBuffer(params)
        self._fields = plugin_fields(params)       # alive as long as the plugin

    def __repr__(self):
        return f"<{self.params.summary()} phase={getattr(self.phase, 'name', self.phase)}>"

    # -- IPluginV3 --------------------------------------------------------------------------------
    def get_capability_interface(self, capability_type):
        return self

    def clone(self):
        """A deep copy: same fields and phase; the copy makes its own signs buffer."""
        c = SawAttention(self.params, self.phase)
        return c

    def destroy(self):
        self._signs.release()

    # -- IPluginV3OneBuild --------------------------------------------------------------------------
    def get_output_data_types(self, input_types):
        if len(input_types) != NUM_INPUTS:
            raise core.ShapeError(f"SawAttention takes {NUM_INPUTS} inputs, got "
                                  f"{len(input_types)}")
        return [input_types[core.QKV]]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        if len(inputs) != NUM_INPUTS:
            raise core.ShapeError(f"SawAttention takes {NUM_INPUTS} inputs, got {len(inputs)}")
        qkv = inputs[core.QKV]
        if len(qkv) != 2:
            raise core.ShapeError(f"SawAttention: qkv must have rank 2, got rank {len(qkv)}")
        width = qkv[1].get_constant_value() if qkv[1].is_constant() else None
        out = core.output_width(self.params, width)
        return [_dims_exprs([qkv[0], expr_builder.constant(out)])]

    def supports_format_combination(self, pos, in_out, num_inputs):
        types = [d.desc.type for d in in_out]
        formats = [d.desc.format for d in in_out]
        return core.supports_format(self.params, pos, types, formats, num_inputs)

    def configure_plugin(self, inp, out):
        core.check_shapes(self.params, [d.desc.dims for d in inp], [d.desc.dims for d in out])

    def get_workspace_size(self, inp, out):
        act = core.ACT_TYPES.get(core.type_name(inp[core.QKV].desc.type), "fp16")
        return core.workspace_for_profile(self.params, [d.max for d in inp], act)

    def get_valid_tactics(self):
        return []

    # -- IPluginV3OneRuntime ------------------------------------------------------------------------
    def set_tactic(self, tactic):
        pass

    def on_shape_change(self, inp, out):
        core.check_shapes(self.params, [d.dims for d in inp], [d.dims for d in out])

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        if self.phase == trt.TensorRTPhase.BUILD:
            # The builder times enqueue on uninitialized inputs: block tables and lengths would
            # be garbage, so launching would read and write outside the pool.
            return
        core.enqueue(self.params, input_desc, output_desc, inputs, outputs, workspace, stream,
                     signs_ptr=self._signs.ptr)

    def attach_to_context(self, resource_context):
        return self.clone()

    def get_fields_to_serialize(self):
        return self._fields

    @property
    def signs_allocated(self) -> bool:
        return self._signs.allocated


class SawAttentionCreator(trt.IPluginCreatorV3One):
    """Creates SawAttention from a PluginFieldCollection (network definition or deserialization)."""

    def __init__(self):
        trt.IPluginCreatorV3One.__init__(self)
        self.name = PLUGIN_NAME
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        self.field_names = _Fields([
            trt.PluginField(f.name, np.array([], dtype={"int32": np.int32,
                                                         "float32": np.float32,
                                                         "char": np.int8}[f.kind]),
                            _FIELD_TYPES[f.kind]) for f in FIELDS])

    def create_plugin(self, name, fc, phase):
        return SawAttention(params_from_fields(fc), phase)


_registered: dict = {}       # registry id -> creator (Python creators must stay alive)


def register(registry=None) -> SawAttentionCreator:
    """Register the creator with a plugin registry (default: trt.get_plugin_registry()).
    Idempotent: a second call returns the creator registered first."""
    registry = registry if registry is not None else trt.get_plugin_registry()
    key = id(registry)
    if key in _registered:
        return _registered[key]
    creator = SawAttentionCreator()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"could not register {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v"
                           f"{PLUGIN_VERSION}: a creator with that name is already registered "
                           "by another module")
    _registered[key] = creator
    return creator


def create(params: AttentionParams, phase=None) -> SawAttention:
    """A plugin instance through the registered creator and serialized fields (the path
    TensorRT takes), in the BUILD phase unless told otherwise."""
    creator = register()
    fields = plugin_fields(params)
    return creator.create_plugin(PLUGIN_NAME, fields,
                                 trt.TensorRTPhase.BUILD if phase is None else phase)
