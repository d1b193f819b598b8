"""python tests/clean_exit.py SCRIPT [args...]: run SCRIPT as __main__, then exit 3 when a gloo
process group's worker threads are still running although the script has returned.

Such threads outlive `destroy_process_group` when something still holds the group (see
`wantune.train.parallel.before_process_group`); at interpreter exit one of them may release a
tensor and abort the process after all its work, a failure that shows only now and then. Checked
here on every run, it fails every time. Linux only (thread names from /proc); elsewhere it only
runs SCRIPT.
"""
import os
import runpy
import sys


def gloo_threads() -> list[str]:
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def main() -> int:
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    left = gloo_threads()
    if code == 0 and left:
        print(f"clean_exit: {script} returned with the process group's threads still running "
              f"({', '.join(sorted(left))}): it was not torn down", file=sys.stderr)
        return 3
    return code


if __name__ == "__main__":
    sys.exit(main())
