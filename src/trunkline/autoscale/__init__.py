"""Replica providers (moving to `trunkline.providers`)."""
