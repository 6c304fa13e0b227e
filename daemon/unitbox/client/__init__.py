"""The client side of the `unitbox` command: `run`, `status`, `logs`,
`cancel`, `files` and `runs` talk to a unitbox server over its HTTP API
(docs/api.md), from any machine; they never read the server's configuration."""
