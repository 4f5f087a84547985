"""Weight initialisers: He, glowworm swarm (GSO / IFAS)."""
