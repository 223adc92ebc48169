from sputnik.cli import main

raise SystemExit(main())
