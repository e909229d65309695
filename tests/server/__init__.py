"""Tests of `jaxserve serve` over loopback: OpenAI SDKs (Python, Node), errors, load, CLI."""
