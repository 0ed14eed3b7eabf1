"""deskgpu: the command-line face of a shared multi-GPU workstation."""

__version__ = "0.1.0"
