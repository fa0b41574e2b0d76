"""The OpenAI-compatible API's bodies, one concept a module (the ingress, ``cluster.ingress``,
serves them over HTTP):

* ``fields``: the field policy: every request field honoured, refused or ignored;
* ``requests``: the request bodies, and how they become the engine's sampling parameters;
* ``limits``: how big a request may be before it is read;
* ``logprobs``: each token's text and bytes, and logprobs in OpenAI's shapes;
* ``responses``: the response bodies as typed models, and their builders;
* ``tool_calls``: a chat reply's text as OpenAI's tool calls (Hermes ``<tool_call>`` blocks);
* ``streaming``: a reply as server-sent events.

Imports are absolute (``cluster.openai.requests``): this package never stands for the ``openai``
client package, which only the tests use.
"""
