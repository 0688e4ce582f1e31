"""Errors of image files, shared by the folder reader and the decoder.

Example:
  >>> from slamjax.data import errors
  >>> str(errors.BadFileError("a/b.png", "cannot decode image"))
  'a/b.png: cannot decode image; remove it or set config.data.skip_bad_files=True'
"""


class FolderDataError(ValueError):
  """A problem with the files of an image-folder dataset."""


class BadFileError(FolderDataError):
  """A file that is not an image or does not decode; names the file."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}; remove it or set "
                     "config.data.skip_bad_files=True")
    self.path, self.reason = path, reason
