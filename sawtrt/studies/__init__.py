"""Small measured studies behind numbers quoted in docs/ and asserted in tests."""
