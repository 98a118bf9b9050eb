"""ML Lambda runtime SDK: wrap a predict() callable into a discoverable runtime."""

from runtime_sdk.errors import Rejected

__all__ = ["Rejected"]
