"""ML Lambda runtime SDK: wrap a predict() callable into a discoverable runtime."""
