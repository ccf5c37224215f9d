"""The one way the solver and the scaler read a tensor's values on the host.

On a GPU every such read waits for the device (a host sync), so the code keeps them
few and names each one; tests count the calls (``tests/test_host_syncs.py``)."""


def host_read(t):
    """The values of ``t`` as Python numbers (a scalar for a 0-dim tensor, else nested lists)."""
    return t.tolist()
