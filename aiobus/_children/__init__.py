"""Child brokers: an async function run in a child process with a bus of its own, linked to the parent."""

from .child import ParentLink as ParentLink
from .output import LineSplitter as LineSplitter
from .parent import ChildBroker as ChildBroker
from .parent import ChildUnavailable as ChildUnavailable
from .workers import end_idle_workers as end_idle_workers
