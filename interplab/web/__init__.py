"""interplab.web"""
