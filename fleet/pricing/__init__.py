"""Offline price refreshers: read a cloud's public price list, write a new catalog version."""
