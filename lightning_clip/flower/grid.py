"""``InProcessGrid``: a Flower ``Grid`` that hands each message to a ``ClientApp`` called in this process.

For debugging a strategy and for studies with many runs: a strategy's ``start`` runs unchanged (sampling,
messages, replies, aggregation, evaluation), without the simulation engine's or a SuperLink's processes. It is
not Flower's runtime: each site's ``Context`` (node config, state) is kept here, and the sites run one after
the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from lightning_clip.exceptions import check_positive_int

__all__ = ["InProcessGrid", "ensure_task_identity"]

#: The first node id; site ``i`` has node id ``FIRST_NODE_ID + i``.
FIRST_NODE_ID = 1001


#: The node id of the server's side in Flower (the SuperLink's).
SERVER_NODE_ID = 1


def ensure_task_identity(run_id: int = 1) -> None:
    """Give this process the task identity Flower stamps on new messages, unless a runtime set one already.

    Flower's runtimes set it in the processes they start; a strategy driven in a plain process needs it too.
    """
    for name, value in (("run_id", run_id), ("task_id", 0), ("node_id", SERVER_NODE_ID)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


class InProcessGrid(Grid):
    """``num_sites`` sites, each a ``client_app`` called in this process with its own ``Context``.

    Site ``i`` has node id ``1001 + i`` and the node config ``{"partition-id": i, "num-partitions": num_sites}``
    plus ``node_config`` (what ``run_simulation`` gives its virtual nodes).

    Args:
        client_app: The ``ClientApp`` every site runs.
        num_sites: Number of sites (positive).
        node_config: Extra node config of every site.
        run_config: The run config every site's ``Context`` holds.
    """

    def __init__(self, client_app: ClientApp, num_sites: int, node_config: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        check_positive_int("num_sites", num_sites)
        if not callable(client_app):
            raise TypeError(f"Expected argument `client_app` to be a Flower ClientApp but got {client_app!r}")
        self.client_app = client_app
        ensure_task_identity()
        self._run = Run.create_empty(run_id=1)
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=1, node_id=FIRST_NODE_ID + i,
                                       node_config={"partition-id": i, "num-partitions": num_sites,
                                                    **dict(node_config or {})},
                                       state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_sites)
        }
        self._inbox: dict[str, Message] = {}  # by the message's object id (a hash of its content and metadata)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._inbox[msg.object_id] = msg
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.deliver([self._inbox.pop(i) for i in message_ids if i in self._inbox])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def deliver(self, messages: Sequence[Message]) -> list[Message]:
        """Each message's reply from its site's ``client_app``, in order (a site's exception propagates)."""
        return [self.client_app(msg, self.contexts[msg.metadata.dst_node_id]) for msg in messages]
