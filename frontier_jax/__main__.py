from frontier_jax.cli import main

raise SystemExit(main())
