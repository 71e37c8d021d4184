"""Pure compiler: policy + inventory -> per-host desired state. No I/O, no clock, no globals."""
