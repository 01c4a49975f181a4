"""Rebuild the HSCR reproduction table on the fixture (see docs/trainer.md): python bench/reproduce.py --help"""

from hscr_trainer.reproduce import main

if __name__ == "__main__":
    main()
