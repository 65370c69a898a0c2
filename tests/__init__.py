"""The test suite (docs/development.md, Tests): unit/, contract/ and e2e/ hold the tests,
support/ the helpers they import (``tests.support...``); the fixtures are in conftest.py."""
