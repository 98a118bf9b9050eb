"""Model packages: built with their locked requirements, stored by digest, run in environments of their own."""
