"""The sharding layer on torch.distributed (tensor parallel + FSDP2 on a DeviceMesh).

Empty until the sharding issue lands; the package exists so the layout, the
wheel and the imports are in place from the start.
"""
