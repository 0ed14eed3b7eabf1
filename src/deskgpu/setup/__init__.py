"""Setting up the box: the files it needs, generated from the host config (`deskgpu setup`)."""
