from .errors import RealmError
