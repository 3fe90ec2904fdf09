"""The program the sandbox executes: it confines itself, then runs one sample's code and its tests.

Run as `python -I sandbox_launcher.py SETTINGS_JSON` with the nonce on stdin and the verdict pipe
inherited (standard library only: it must not import the package or anything that starts threads).
In order:

1. read the settings, the nonce and `program.py` from the working directory;
2. with `confine_mounts` (inside fresh user + mount + pid + net namespaces): make every mount
   read-only (`mount_setattr(/, AT_RECURSIVE, MOUNT_ATTR_RDONLY)`), mount a size-limited tmpfs
   over the working directory, drop every capability (bounding set, effective / permitted /
   inheritable sets) and set no_new_privs, so the code cannot undo any of it;
3. set the rlimits (CPU seconds, address space, file size, processes, no core files);
4. with `block_sockets` (no network namespace): make socket creation raise;
5. write `started` to the verdict pipe, run the program in `__main__`, and only if it returns
   normally (tests included) write `passed NONCE`; `sys.exit(...)` from the program, an
   exception, `os._exit`, or a signal leave no `passed` line, so the sample fails.
"""

import ctypes
import json
import os
import resource
import socket
import sys
import traceback

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 (the unified syscall table)
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_CAP_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _confine_mounts(libc, workdir: str, tmpfs_bytes: int) -> None:
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        libc.syscall(
            _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
        ),
        "mount_setattr(/, read-only)",
    )
    options = f"size={tmpfs_bytes},mode=0700".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", 0, options), f"mount tmpfs on {workdir}")
    os.chdir(workdir)


def _drop_capabilities(libc) -> None:
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability this kernel knows
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    _check(libc.syscall(_SYS_CAPSET[os.uname().machine], header, data), "capset")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _set_limits(settings: dict) -> None:
    limits = {
        resource.RLIMIT_CPU: settings["cpu_s"],
        resource.RLIMIT_AS: settings["memory_bytes"],
        resource.RLIMIT_FSIZE: settings["file_bytes"],
        resource.RLIMIT_NPROC: settings["processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def _block_sockets() -> None:
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = refuse
    socket.create_connection = refuse
    socket.socketpair = refuse
    sys.modules["_socket"].socket = refuse


def main() -> None:
    settings = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    verdict = settings["verdict_fd"]
    try:
        if settings["confine_mounts"]:
            libc = ctypes.CDLL(None, use_errno=True)
            _confine_mounts(libc, os.getcwd(), settings["tmpfs_bytes"])
            _drop_capabilities(libc)
        _set_limits(settings)
        if settings["block_sockets"]:
            _block_sockets()
    except OSError as e:
        print(f"sandbox launcher: {e}", file=sys.stderr)
        os._exit(120)
    os.write(verdict, b"started\n")
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        print(f"sandbox: the program exited (code {e.code!r}) before its tests finished", file=sys.stderr)
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(verdict, f"passed {nonce}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    main()
