from relapse import notices

notices.install()
