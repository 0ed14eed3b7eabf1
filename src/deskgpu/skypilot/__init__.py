"""SkyPilot at its edge, client side: the SDK (`sdk`, the only client module that imports `sky`),
plain HTTP to the API server (`http`), and which cluster or job a name means (`lookup`)."""
