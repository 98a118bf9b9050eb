"""ML Lambda runtime SDK: wrap a predict() callable into a discoverable runtime."""

from runtime_sdk.app import Rejected

__all__ = ["Rejected"]
