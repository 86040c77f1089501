"""Safe Maildir(++) delivery and moves: the Postfix virtual(8) procedure, Dovecot-compatible.

See delivery.py for the write procedure, safety.py for the ownership and symlink rules,
quota.py for Maildir++ quota and folders.py for folder creation and subscriptions.
"""

from __future__ import annotations

from sentlink.maildir.cache import FolderCache
from sentlink.maildir.delivery import MaildirDelivery
from sentlink.maildir.folders import ensure_folder, list_messages
from sentlink.maildir.moves import find_message, move_message, set_flags
from sentlink.maildir.names import folder_path, new_uniq, parse_flags, split_uniq
from sentlink.maildir.safety import Owner, resolve_owner

__all__ = [
    "FolderCache",
    "MaildirDelivery",
    "Owner",
    "ensure_folder",
    "find_message",
    "folder_path",
    "list_messages",
    "move_message",
    "new_uniq",
    "parse_flags",
    "resolve_owner",
    "set_flags",
    "split_uniq",
]
