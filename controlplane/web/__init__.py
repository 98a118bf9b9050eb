"""The dashboard and its management pages, charts and /metrics: pure renderings of a PlaneView, plus sign-in."""
