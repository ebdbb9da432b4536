import sys

from kvstore.server.main import main

sys.exit(main())
