"""What only admins see of the node side: the node's name, its paths and libvirt's own text.

Customers never see a node. An error that has such details keeps them in
``data["node_detail"]`` and a message without them; a note of a successful answer is a
:class:`NodeNote`, a message whose ``detail`` is kept apart. The API's edge
(vmapi.api.errors) shows the details to admins and drops them, into the server's log,
for everyone else. Pure: every layer may import it.
"""

from __future__ import annotations

#: the key of an error's ``data`` that only admins see
NODE_DETAIL = "node_detail"


class NodeNote(str):
    """A note of a successful answer, as anyone may read it; ``detail`` (the node's name,
    paths, libvirt's text) is for admins only."""

    detail: str

    def __new__(cls, text: str, detail: str) -> NodeNote:
        note = super().__new__(cls, text)
        note.detail = detail
        return note


def prefixed(prefix: str, message: str) -> str:
    """``prefix + message``, keeping a note's detail apart."""
    if isinstance(message, NodeNote):
        return NodeNote(prefix + message, message.detail)
    return prefix + message


def for_admins(message: str) -> str:
    """The message as an admin reads it: a note's detail follows it."""
    if isinstance(message, NodeNote):
        return f"{message} (Node side: {message.detail})"
    return message
