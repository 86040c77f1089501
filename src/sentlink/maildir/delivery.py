"""Writing one message into a Maildir folder: the Postfix virtual(8) / maildir(5) procedure.

1. create ``tmp/<uniq>`` with O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600, fchown to the owner;
2. write, fsync, close (a file is never visible in cur/ before all its bytes are on disk);
3. check the Maildir++ quota;
4. link() it to ``cur/<uniq>,S=<size>:2,<flags>`` (link never replaces an existing file), fall
   back to rename() where hard links are not possible, unlink the tmp name, fsync ``cur/``;
5. add the size to ``maildirsize``.
Any failure removes the tmp file, so an aborted delivery leaves nothing behind.
Spec: https://cr.yp.to/proto/maildir.html; ``S=<size>`` is Dovecot's physical size field, which
lets it skip a stat() per message.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import TracebackType

from sentlink.errors import CaptureError
from sentlink.maildir.cache import FolderCache, FolderLease, lease_folder
from sentlink.maildir.folders import OpenFolder
from sentlink.maildir.names import INFO_SEPARATOR, new_uniq, normalize_flags
from sentlink.maildir.quota import add_to_quota, check_quota
from sentlink.maildir.safety import NEW_FILE_FLAGS, Owner, capture_error, fsync_dir, give_fd

log = logging.getLogger(__name__)

_ATTEMPTS = 5  # a unique-name collision is astronomically unlikely; a few tries prove it was one
# link() errors meaning "no hard links here" (FAT, some FUSE/network file systems, tmp/ on
# another mount), where the Maildir spec's rename() is the remaining way into cur/.
_NO_LINK = (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


class MaildirDelivery:
    """One message being written into a folder. Use ``start``; then ``write`` and ``commit``.

    Also a context manager: leaving the block without commit() (an exception, or none) aborts.
    Every method that fails has already aborted, so no partial file is left behind.
    """

    def __init__(self, lease: FolderLease, owner: Owner, uniq: str, fd: int) -> None:
        self._lease: FolderLease | None = lease
        self._folder: OpenFolder | None = lease.folder
        folder = lease.folder
        self._owner = owner
        self._uniq = uniq
        self._fd = fd
        self._size = 0
        self.folder_path = folder.path

    @property
    def tmp_path(self) -> Path:
        """The message's file in ``tmp/`` (built on demand: only error messages need it)."""
        return self.folder_path / "tmp" / self._uniq

    @classmethod
    def start(
        cls, root: Path, folder: str, owner: Owner, folders: FolderCache | None = None
    ) -> MaildirDelivery:
        """Check/create the Maildir and folder, and create the message's file in ``tmp/``.

        With ``folders``, the folder's checked descriptors come from (and stay in) that cache.
        """
        lease = lease_folder(root, folder, owner, folders)
        opened = lease.folder
        try:
            for _ in range(_ATTEMPTS):
                uniq = new_uniq()
                try:
                    fd = os.open(uniq, NEW_FILE_FLAGS, 0o600, dir_fd=opened.tmp_fd)
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise capture_error(exc, "cannot create", opened.path / "tmp" / uniq) from exc
                delivery = cls(lease, owner, uniq, fd)
                try:
                    give_fd(fd, owner, delivery.tmp_path)
                except BaseException:
                    delivery.abort()
                    raise
                return delivery
            raise CaptureError("io", f"{opened.path / 'tmp'}: no unused unique name")
        except BaseException:
            lease.close()
            raise

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            raise RuntimeError("write() after commit() or abort()")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError as exc:
            self.abort()
            raise capture_error(exc, "cannot write", self.tmp_path) from exc

    def commit(self, flags: str = "S") -> Path:
        """File the message in ``cur/`` as ``<uniq>,S=<size>:2,<flags>``; return its path."""
        folder = self._folder
        if folder is None or self._fd < 0:
            raise RuntimeError("commit() after commit() or abort()")
        try:
            flags = normalize_flags(flags)
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise capture_error(exc, "cannot fsync", self.tmp_path) from exc
            finally:
                os.close(self._fd)
                self._fd = -1
            has_quota = check_quota(folder.root_fd, folder.root, self._size)
            final = self._file_into_cur(folder, flags)
        except BaseException:
            self.abort()
            raise
        try:
            os.unlink(self._uniq, dir_fd=folder.tmp_fd)
        except FileNotFoundError:
            pass  # the rename() fallback already moved it
        except OSError as exc:
            # Filed already; a second name in tmp/ is harmless (tmp/ is never read as mail).
            log.warning("cannot remove %s: %s", self.tmp_path, exc.strerror)
        # The file's fsync makes its bytes durable, this one its name in cur/: without it a crash
        # can lose a copy the MTA was already told about. Dovecot does the same after saving into
        # a Maildir (maildir-save.c, maildir_transaction_fsync_dirs: fdatasync of new/ and cur/
        # unless fsync_mode=never); Postfix virtual(8)/local(8) fsync only the file (mail_copy()
        # with MAIL_COPY_TOFILE) and leave the link() to the file system.
        try:
            fsync_dir(folder.cur_fd, folder.path / "cur")
        except CaptureError as exc:
            # The message is in cur/ and will be seen; failing now would only invite a duplicate.
            log.warning("filed without a durable directory entry: %s", exc)
        try:
            if has_quota:
                add_to_quota(folder.root_fd, folder.root, self._size)
        finally:
            self._close_dirs()
        return folder.path / "cur" / final

    def abort(self) -> None:
        """Remove the tmp file; safe to call more than once and after commit()."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._folder is not None:
            try:
                os.unlink(self._uniq, dir_fd=self._folder.tmp_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.tmp_path, exc.strerror)
            finally:
                self._close_dirs()

    def __enter__(self) -> MaildirDelivery:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def _file_into_cur(self, folder: OpenFolder, flags: str) -> str:
        uniq = self._uniq
        for _ in range(_ATTEMPTS):
            final = f"{uniq},S={self._size}{INFO_SEPARATOR}{flags}"
            try:
                os.link(
                    self._uniq,
                    final,
                    src_dir_fd=folder.tmp_fd,
                    dst_dir_fd=folder.cur_fd,
                    follow_symlinks=False,
                )
                return final
            except FileExistsError:
                uniq = new_uniq()  # never overwrite a message: take another name
                continue
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise capture_error(exc, "cannot link into", folder.path / "cur") from exc
            if self._rename_into_cur(folder, final):
                return final
            uniq = new_uniq()
        raise CaptureError("io", f"{folder.path / 'cur'}: no unused unique name")

    def _rename_into_cur(self, folder: OpenFolder, final: str) -> bool:
        # rename() would replace an existing file; check first (the name is unique, so this only
        # guards against the impossible, without a race worth closing).
        try:
            os.stat(final, dir_fd=folder.cur_fd, follow_symlinks=False)
            return False
        except FileNotFoundError:
            pass
        try:
            os.rename(self._uniq, final, src_dir_fd=folder.tmp_fd, dst_dir_fd=folder.cur_fd)
        except OSError as exc:
            raise capture_error(exc, "cannot rename into", folder.path / "cur") from exc
        return True

    def _close_dirs(self) -> None:
        self._folder = None
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.close()
