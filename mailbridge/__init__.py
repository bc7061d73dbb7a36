"""mailbridge: a self-hosted email-to-SMS bridge speaking iSendPro's mail 2 SMS interface.

Pipeline, one module per stage:
intake (SMTP) -> mime -> envoi / attachments -> checks -> store -> dispatch -> providers
-> report -> mailer.
"""

__version__ = "0.1.0"
