"""Many hosts on one machine: network namespaces, a relay to PostgreSQL, the scenario that runs on them."""
