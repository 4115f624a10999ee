"""python -m flowkern demo [--quick] | info"""
import sys


def info():
    import torch

    import flowkern
    print(f"flowkern {flowkern.__version__}, torch {torch.__version__}")
    for name, ok in flowkern.available().items():
        print(f"  backend {name:7s} {'available' if ok else 'not available'}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd, rest = (argv[0], argv[1:]) if argv else ("info", [])
    if cmd == "demo":
        from .demo.main import main as demo
        demo(rest)
    elif cmd == "info":
        info()
    else:
        sys.exit(f"usage: python -m flowkern demo [--quick] | info  (unknown command {cmd!r})")


if __name__ == "__main__":
    main()
