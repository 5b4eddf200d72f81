# Minimal stubs for pymemcache 4.0 (it ships no types): only what dq uses.
from pymemcache.client.base import Client as Client
from pymemcache.client.base import KeepaliveOpts as KeepaliveOpts
from pymemcache.client.base import PooledClient as PooledClient
from pymemcache.client.hash import HashClient as HashClient
from pymemcache.exceptions import MemcacheClientError as MemcacheClientError
from pymemcache.exceptions import MemcacheError as MemcacheError
from pymemcache.exceptions import MemcacheIllegalInputError as MemcacheIllegalInputError
from pymemcache.exceptions import MemcacheServerError as MemcacheServerError
from pymemcache.exceptions import MemcacheUnexpectedCloseError as MemcacheUnexpectedCloseError
from pymemcache.exceptions import MemcacheUnknownCommandError as MemcacheUnknownCommandError
from pymemcache.exceptions import MemcacheUnknownError as MemcacheUnknownError

__version__: str
