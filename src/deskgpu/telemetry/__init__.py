"""Every node's GPUs from Prometheus: NVIDIA's dcgm-exporter and deskgpu's own textfile.

`promapi` is the HTTP API (instant and range queries, the targets list); `gpus` turns one
instant look into the same `NvmlView` NVML gives (GPUs, their pods, host processes outside
pods, each node fresh or stale); `history` answers reap's window with range queries, as the
same evidence samples the observation history gives. Nothing here imports SkyPilot or NVML.
"""
