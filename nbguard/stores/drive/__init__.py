"""Google Drive as a snapshot store, through the Drive API (pydrive2 + google-auth).

    store = open_drive_store("gdrive://nbguard/mynotebook")

Credentials: the ``credentials=`` argument, else ``$NBGUARD_DRIVE_CREDENTIALS`` (a JSON file's path
or the JSON text), else the Kaggle or Colab notebook secret of that name, else (Colab) the notebook
user's own sign-in. API root: ``api_root=``, else ``$NBGUARD_DRIVE_API_ROOT``, else Google's.
Needs ``pip install 'nbguard[drive]'``.
"""

from .auth import CREDENTIALS_ENV, DRIVE_SCOPE, load_credentials
from .client import API_ROOT_ENV, DEFAULT_API_ROOT, DriveClient
from .retry import RetryPolicy
from .store import DriveStore, open_drive_store, parse_drive_url
from .transfer import DEFAULT_CHUNK_SIZE

__all__ = [
    "API_ROOT_ENV",
    "CREDENTIALS_ENV",
    "DEFAULT_API_ROOT",
    "DEFAULT_CHUNK_SIZE",
    "DRIVE_SCOPE",
    "DriveClient",
    "DriveStore",
    "RetryPolicy",
    "load_credentials",
    "open_drive_store",
    "parse_drive_url",
]
