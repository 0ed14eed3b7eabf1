"""Zombie reaping: evidence -> pure decisions -> (with `--yes`) warnings and teardowns.

`evidence` is the data (and its JSON document), `rule` the pure decision, `history` the
SQLite store that `deskgpu observe` fills, `gather` builds evidence from the live box,
`audit` the lock and the JSON-lines log, `act` the only place anything is torn down.
"""
