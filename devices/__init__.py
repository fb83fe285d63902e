"""fleetsim devices: hardware profiles, interaction streams and drift, device state, Ray hosts, models."""
