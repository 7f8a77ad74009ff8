"""The one network seam: every call to the GaussDB API (or the simulator) goes through here."""
