"""Usage accounting over the observation history: `deskgpu report` and the metrics textfile."""
