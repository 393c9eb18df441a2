"""interplab.tasks"""
