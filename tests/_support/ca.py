"""The test session's CA: made once, when ``tests/conftest.py`` imports this module, before anything imports
aiohttp. Tests take it from the ``session_ca`` fixture; only a module that cannot take a fixture where it
needs the CA imports :data:`SESSION_CA` from here (never from a conftest).

aiohttp (azure-core's async transport) builds its default SSL context from SSL_CERT_FILE once, when it is
first imported. So the session's CA exists, and the variable points at it, before anything imports it.
"""

from __future__ import annotations

import tempfile

from apimvault.local import prepare_ca

SESSION_CA = prepare_ca(tempfile.mkdtemp(prefix="apimvault-tests-"))
