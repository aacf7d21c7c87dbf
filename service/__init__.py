"""alex-server: AI-agent tasks as a service, every step streamed over Server-Sent Events."""

__version__ = "0.1.0"
