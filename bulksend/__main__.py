import sys

try:
    from bulksend.cli import main
except KeyboardInterrupt:  # a SIGINT while the program itself loads: exit as one does
    sys.exit(130)

sys.exit(main())
