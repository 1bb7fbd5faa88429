"""Running on many devices and hosts: meshes and sharding rules, multi-host start-up."""
