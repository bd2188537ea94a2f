"""The release of vmapi (what ``info.version`` of the OpenAPI document and setup.cfg say).

Not the API version in URLs (``/api/v1``): that is vmapi.api.version.
"""

__version__ = "1.0.0"
