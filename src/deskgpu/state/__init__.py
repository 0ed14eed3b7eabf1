"""The box's own records, below every command: the reap history (SQLite), the reap audit log
(JSON lines) and the usage store. Each file is deskgpu's alone, checked before it is read."""
