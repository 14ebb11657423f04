from meterhouse.cli import main

raise SystemExit(main())
