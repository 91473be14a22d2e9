from seeddelta.cli import main

raise SystemExit(main())
